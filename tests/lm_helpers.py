"""Tiny language models with random weights, built offline: no download, seconds to make.

A byte-level BPE tokenizer trained on a slice of the default corpus, and Llama / Mistral
configs small enough that a forward pass takes milliseconds. Weights are scaled up from
transformers' default init so that attention is far from uniform: a wrong mask changes the
losses by far more than the tolerances the tests use.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 384
TEXT_CHARS = 40_000


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    from ctxbench.models.lm import default_corpus_text

    return default_corpus_text()[:TEXT_CHARS]


@functools.lru_cache(maxsize=1)
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([corpus_text()[:10_000]], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def config(arch: str = "llama", **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=0, pad_token_id=None)
    kw.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[arch]
    return cls(**kw)


def model(arch: str = "llama", attn: str = "eager", seed: int = 0, **overrides):
    """A tiny causal LM in fp32, eval mode, seeded random weights."""
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[arch]
    cfg = config(arch, **overrides)
    cfg._attn_implementation = attn
    return cls(cfg).float().eval()


def checkpoint(folder: str, arch: str = "llama", **overrides) -> str:
    """Save a tiny model and the tokenizer as a local checkpoint folder; returns it."""
    os.makedirs(folder, exist_ok=True)
    model(arch, **overrides).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def token_losses(m, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [N-1] of ids [N] (fp32), without a KV cache."""
    with torch.no_grad():
        logits = m(input_ids=ids.unsqueeze(0), use_cache=False).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")
